"""ray-fer: facial expression recognition at scale on Ray.

Labelling (`infer`): files -> decode tasks (`data`, `decode`) -> predictor actors (`predictor`)
-> Parquet + `_SUCCESS` (`output`). Training (`train`): image folders -> decoded uint8 faces
(`data`) -> Ray Train workers -> checkpoints (`runs`) -> the best one as a model bundle (`model`).
Evaluation (`evaluate`) runs labelling's chain over a labelled folder into `metrics` and `report`.
docs/architecture.md maps every module.
"""

__version__ = "0.1.0"
