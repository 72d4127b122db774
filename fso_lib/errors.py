"""Errors shared across the library, so that one ``except`` catches them wherever they come from."""


class UnsupportedLayerError(TypeError):
    """A model holds a layer that the curvature code or the layer statistics do not handle;
    the message names the layer and says which layers are supported."""
