"""Labelling with Ray Data: inputs streamed from listing tasks (`inputs`, `listing`), decoded in
Ray tasks (`decode`, `datasets`), labelled by predictor actors (`predictor`, `face_predictor`,
sized by `plan`, assembled by `pipeline`), written through the store's output protocol (`infer`);
evaluation (`evaluate`), a few files without Ray (`predict`) and model export (`export`).
Imports nothing of training."""
