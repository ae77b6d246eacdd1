"""The frozen-feature evaluation layer, between pretraining (``selfsup``) and transfer (``downstream``).

kNN classification (``knn``), dense features from a backbone (``features``), DAVIS label propagation and its
J&F scorer (``propagation``, ``davis_metrics``), VOC segment retrieval (``retrieval``), the mIoU meter
(``miou``), the DAVIS and VOC readers (``davis``, ``voc``), the figures they draw (``figures``), and the
pretraining monitors built from them (``pretrain_monitors``). It imports ``selfsup``, never ``downstream``.
Importing the package registers the ``davis2017``, ``voc2012`` and ``voc07`` datasets.
"""
from . import davis, voc  # noqa: F401  (register the readers in selfsup.data.DATASETS)
