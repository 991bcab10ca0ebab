"""The tiny end-to-end run shared by the CLI, baseline and resume tests: two objects (one of
each image-size preset) and ``--set`` overrides that make ``fedpatch train`` take seconds
(resnet18 with random weights on 64x64 / 96x72 images)."""

OBJECTS = ("pipe_clip", "tank_screw")
TINY_SETS = [
    "--set", "model.backbone=resnet18",
    "--set", "model.pretrained=false",
    "--set", "data.resize_small=[64,64]",
    "--set", "data.resize_large=[96,72]",
]  # fmt: skip
QUIET = ["--set", "runtime.progress=false"]
