"""mope_data: the shard format and the loaders over it (plain PyTorch + webdataset; imports nothing of ``harness``).

- :mod:`mope_data.format`: the read side of the shard contract (key and member rules, manifest, dataset info, shard
  paths, sample iteration, few-shot index, checksums); :mod:`datasets_prep` writes with the same names.
- :mod:`mope_data.config`: :class:`LoaderConfig`.
- :mod:`mope_data.transforms`: per-sample decoding (tokenizer, image / audio / frames) and ``collate``.
- :mod:`mope_data.pipeline`: the webdataset stages (node / worker split, seeded resampling, shuffling, rebatching).
- :mod:`mope_data.loaders`: :func:`make_train_loader` and :func:`make_eval_loader`.
"""

from .config import LoaderConfig
from .format import DatasetInfo, MissingShardsError, ShardFormatError, dataset_info, read_manifest, sha256_file
from .loaders import (
    EvalLoader,
    FewShotTrainLoader,
    StreamingTrainLoader,
    equal_split_indices,
    make_eval_loader,
    make_train_loader,
)
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MMBT_MEAN,
    MMBT_STD,
    collate,
    default_tokenizer_path,
    image_transform,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MMBT_MEAN",
    "MMBT_STD",
    "DatasetInfo",
    "EvalLoader",
    "FewShotTrainLoader",
    "LoaderConfig",
    "MissingShardsError",
    "ShardFormatError",
    "StreamingTrainLoader",
    "collate",
    "dataset_info",
    "default_tokenizer_path",
    "equal_split_indices",
    "image_transform",
    "make_eval_loader",
    "make_train_loader",
    "read_manifest",
    "sha256_file",
]
