"""facecore plugin: the MobileFaceNet backbone, registered as ``example-mobilefacenet``.

facecore bundles its own ``mobilefacenet`` (arcface_torch's mbf layout); this package is the
example of a third-party plugin (the paper's network with a width multiplier), under a name
of its own so that both can be installed together.

Importing this module stays cheap (no torch): facecore imports every plugin to list it,
and the network module is loaded only when a model is built.
"""

from __future__ import annotations

from typing import Any, Callable

from facecore import hookimpl

__version__ = "0.1.0"

# The options a user may set in the ``model`` section next to ``backbone: example-mobilefacenet``.
# ``embedding_size`` is not here: the core passes it to every backbone.
SCHEMA: dict = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "width_mult": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 4,
            "default": 1.0,
            "description": "Multiplies every layer's channel count (rounded to a multiple of 8).",
        },
        "dropout": {
            "type": "number",
            "minimum": 0,
            "exclusiveMaximum": 1,
            "default": 0.0,
            "description": "Dropout probability before the embedding layer.",
        },
    },
}


def example_mobilefacenet(embedding_size: int = 512, width_mult: float = 1.0, dropout: float = 0.0) -> Any:
    """Build a MobileFaceNet mapping (N, 3, 112, 112) images to (N, embedding_size) embeddings."""
    from .model import MobileFaceNet

    return MobileFaceNet(embedding_size=embedding_size, width_mult=width_mult, dropout=dropout)


@hookimpl
def register_backbones(register: Callable[..., None]) -> None:
    """Register ``example-mobilefacenet`` with its options schema."""
    register(
        "example-mobilefacenet",
        example_mobilefacenet,
        schema=SCHEMA,
        description="MobileFaceNet (Chen et al. 2018): ~1M parameters, GDC embedding, 112x112 input",
    )
