"""A body under the clothes: the free anny body model fitted to a photo's landmarks and person mask.

- `landmarks`: the MediaPipe-33 layout, where its points sit on anny, keypoint sidecars;
- `posing`: anny as a function of joint angles, phenotype and an orthographic camera; `BodyParameters`;
- `fit`: the fitter (`fit_body`, `FitConfig`, `BodyFit`, `UnusableLandmarks`);
- `synthetic`: rendered bodies with known truth (tests, benchmarks);
- `export`: the body mesh, its parameters and a rigged GLB.
"""

from model.body.fit import BodyFit, FitConfig, UnusableLandmarks, fit_body
from model.body.posing import BodyParameters, body_vertices

__all__ = ["BodyFit", "BodyParameters", "FitConfig", "UnusableLandmarks", "body_vertices", "fit_body"]
