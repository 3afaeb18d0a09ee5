"""Training pipelines: pre-training, fine-tuning and export (the ``greenmim`` command's Python API)."""
from .engine import NonFiniteLossError, NothingTrainedError, TrainSummary
from .export import export
from .finetune import FinetuneConfig, finetune
from .pretrain import PretrainConfig, pretrain

__all__ = ['PretrainConfig', 'pretrain', 'FinetuneConfig', 'finetune', 'export', 'TrainSummary',
           'NonFiniteLossError', 'NothingTrainedError']
