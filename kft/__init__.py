"""kft: fine-tune pretrained Keras applications backbones."""

__version__ = "0.1.0"
