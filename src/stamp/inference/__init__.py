"""Inference: ``Segmenter`` (generate + masks with cache reuse) and SAM refinement."""

__all__ = ["Segmenter", "SegmentationResult"]


def __getattr__(name: str):
    # imported lazily: the segmenter builds on stamp.evaluation, which builds on inference.generate
    if name in __all__:
        from stamp.inference import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'stamp.inference' has no attribute {name!r}")
