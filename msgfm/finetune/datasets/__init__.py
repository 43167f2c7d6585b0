"""Converters for the downstream datasets, run as ``msgfm convert KIND``.

They are registered with the pretraining converters in ``msgfm.data.convert.KINDS``
(vaihingen, sen12mscr, spacenet and spacenet-buildings). BigEarthNet needs none of its
own: ``msgfm convert bigearthnet`` already writes the 19-class labels.
"""
from msgfm.data.convert import run

__all__ = ["run"]
