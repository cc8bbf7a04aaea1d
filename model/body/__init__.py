"""A body under the clothes: the free anny body model fitted to a photo's landmarks and person mask.

- `anny`: the anny body model (one closed mesh, built once per process), its frame and joint limits;
- `landmarks`: the MediaPipe-33 layout, where its points sit on anny, keypoint sidecars;
- `posing`: anny as a function of joint angles, phenotype and an orthographic camera; `BodyParameters`;
- `fit`: the fitter (`fit_body`, `FitConfig`, `BodyFit`, `UnusableLandmarks`);
- `lifter`: each landmark's depth from the 2D landmarks (trained by `model.training.lifter`);
- `field`: the body as the signed-distance field a body-guided network reads;
- `export`: the body mesh, its parameters and a rigged GLB.
"""

from model.body.fit import BodyFit, FitConfig, UnusableLandmarks, fit_body
from model.body.posing import BodyParameters, body_vertices

__all__ = ["BodyFit", "BodyParameters", "FitConfig", "UnusableLandmarks", "body_vertices", "fit_body"]
