"""course_utils: the support package of the ssl-xai-course notebooks."""

__version__ = "0.1.0"
