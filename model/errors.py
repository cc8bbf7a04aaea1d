"""Exceptions the project raises for bad input, each naming the file and the cause."""


class PifuhdError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class CheckpointError(PifuhdError):
    """A checkpoint file is missing, truncated, of an unknown format or of a wrong layout."""


class InputError(PifuhdError):
    """An input image (or its mask / person box) cannot be used."""


class StoreError(PifuhdError):
    """The output store (a disk, an S3 endpoint) keeps refusing writes: the job stops, keeping its rows."""


class SurfaceError(PifuhdError):
    """A reconstruction gave no usable surface (no faces, or vertices that are not finite)."""
