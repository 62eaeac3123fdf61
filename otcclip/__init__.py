"""otcclip: sanitize image-caption datasets against CLIP poisoning (OTCCLIP)."""

__version__ = "0.1.0"
