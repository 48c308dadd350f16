"""ray-fer: facial expression recognition at scale on Ray.

Train EfficientNet-B0 with Ray Train (`ray_fer.train`), label image stores with Ray Data
(`ray_fer.infer`), and judge models (`ray_fer.evaluate`).
"""

__version__ = "0.1.0"
