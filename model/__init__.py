from model.errors import CheckpointError, InputError, PifuhdError
