"""Region detection and region features for raw images, with boxes.

Example::

    from adapt.regions import build_extractor, check_extractor

    extractor = build_extractor()                 # SSD-MobileNet-v2 boxes + EfficientNet-Lite0 features
    regions = extractor.extract("photo.jpg")      # Regions: boxes (36, 4), features (36, 1280), ...
    check_extractor(model.config.extractor, extractor.identity)   # refuses features of another extractor

    paper = build_extractor("bottom-up-attention")  # the paper's 36 x 2048 features (fetches 250 MB once)
"""

from adapt.regions.base import (
    DEFAULT_NUM_REGIONS,
    FILL_LABEL,
    PooledRegionExtractor,
    RegionExtractor,
    Regions,
    box_geometry,
    fill_boxes,
)
from adapt.regions.bottom_up import BottomUpAttentionExtractor
from adapt.regions.coco_names import COCO_NAMES, coco_name
from adapt.regions.factory import BACKENDS, DEFAULT_EXTRACTOR, build_extractor
from adapt.regions.faster_rcnn import FasterRcnnExtractor
from adapt.regions.identity import ExtractorMismatchError, check_extractor, comparable_identity, identity_differences
from adapt.regions.image import DEFAULT_MAX_PIXELS, ImageError, ImageSource, load_image, shrink_to_max_side
from adapt.regions.ssd import SsdEfficientNetExtractor
from adapt.regions.weights import ExtractorError

__all__ = [
    "BACKENDS",
    "BottomUpAttentionExtractor",
    "COCO_NAMES",
    "DEFAULT_EXTRACTOR",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_NUM_REGIONS",
    "FILL_LABEL",
    "ExtractorError",
    "ExtractorMismatchError",
    "FasterRcnnExtractor",
    "ImageError",
    "ImageSource",
    "PooledRegionExtractor",
    "RegionExtractor",
    "Regions",
    "SsdEfficientNetExtractor",
    "box_geometry",
    "build_extractor",
    "check_extractor",
    "coco_name",
    "comparable_identity",
    "fill_boxes",
    "identity_differences",
    "load_image",
    "shrink_to_max_side",
]
