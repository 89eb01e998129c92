"""ImageNet-1k's classes as timm numbers them (`timm.data.ImageNetInfo`): the order of the logits of
a pretrained 1 000-class head, whatever subset of the classes a tree holds."""
from __future__ import annotations

import functools

SOURCE = "timm.data.ImageNetInfo"


@functools.cache
def imagenet_classes() -> tuple[list[str], list[str]]:
    """(the 1 000 wnids in head order, their descriptions, e.g. 'American alligator, Alligator mississipiensis')."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    return list(info.label_names()), list(info.label_descriptions())


def short_name(description: str) -> str:
    """The first name of a class description ('American alligator'), for picture titles."""
    return description.split(",")[0]
