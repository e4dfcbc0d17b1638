"""Data: every source produces ``Sample``s (sample.py) for the collator (collate.py).

Sources, one module per on-disk format: synthetic.py (generated), refer.py (RefCOCO/+/g,
RefCLEF), grefer.py (gRefCOCO), reasonseg.py (ReasonSeg), llava.py (LLaVA-v1.5 mix). The real
ones share records.py (records -> samples, raw or prepared), masks.py (COCO polygons/RLE),
prompts.py (question/answer templates), io.py (files, ``DataError``) and safe_pickle.py.
mixing.py mixes sources and skips broken samples in training; prepare.py is
``stamp-prepare-data``; datamodule.py serves the loaders.
"""
