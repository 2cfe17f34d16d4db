"""Per-sample features of a frozen, un-prompted complementary encoder, computed once per (encoder, dataset) and
shared by every trial of a sweep (:class:`FeatureCache`); :func:`input_row_digests` finds the distinct inputs."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from mope_data.format import sha256_file, split_manifests

log = logging.getLogger("harness.worker")  # the logger name training logs have always carried


class FeatureCache:
    """Per-sample features of a frozen, un-prompted complementary encoder, computed once per (encoder, dataset).

    Stored beside local shards (``root``: the shard directory; for remote shards the node-local cache,
    :func:`harness.node_cache.feature_cache_root`) under ``feature_cache/<key>/<split>.safetensors`` (a (N, d)
    matrix + the sample keys in the metadata), where key = sha256(encoder cache key + every split manifest's sha256
    + tokenizer settings), so every trial of a sweep reuses it and a changed encoder or dataset gets a new entry.
    """

    def __init__(self, root: Path, key: str):
        self.dir = root / "feature_cache" / key
        self.tables: dict[str, dict[str, int]] = {}
        self.feats: dict[str, torch.Tensor] = {}

    @staticmethod
    def key_for(model, shard_dir: str | Path, lcfg) -> str:
        import hashlib

        from mope.backbones.blackbox import state_dict_fingerprint

        h = hashlib.sha256(state_dict_fingerprint(model.comp_encoder).encode())
        h.update(f"{type(model.comp_encoder).__name__}|{getattr(model.comp_encoder, 'pool', '')}".encode())
        h.update(f"{lcfg.tokenizer}|{lcfg.max_text_len}".encode())
        for m in split_manifests(shard_dir):  # local or remote (URL) shard directory
            h.update(sha256_file(m).encode())
        return h.hexdigest()[:24]

    def build(self, model, lcfg, splits: list[str], *, rank: int, world_size: int) -> None:
        from safetensors.torch import load_file, save_file

        from mope_data import make_eval_loader

        self.dir.mkdir(parents=True, exist_ok=True)
        for split in splits:
            f = self.dir / f"{split}.safetensors"
            if not f.is_file():  # every rank computes its own copy only on first use; writes are atomic
                keys, rows = [], []
                seen: dict[bytes, torch.Tensor] = {}  # distinct inputs (e.g. a demo's few statements) encoded once
                t0 = time.perf_counter()
                with torch.no_grad():
                    for batch in make_eval_loader(lcfg, split, 0, 1):
                        digests = input_row_digests(model.complementary_inputs(batch))
                        first: dict[bytes, int] = {}  # digest -> first row of this batch with that input
                        for i, d in enumerate(digests):
                            if d not in seen:
                                first.setdefault(d, i)
                        if first:
                            idx = torch.tensor(list(first.values()))
                            n = len(digests)
                            sub = {k: v[idx] for k, v in batch.items() if torch.is_tensor(v) and v.shape[:1] == (n,)}
                            feats = model.complementary_feature(sub).float().cpu()
                            seen.update(zip(first, feats, strict=False))
                        rows.append(torch.stack([seen[d] for d in digests]))
                        keys.extend(batch["key"])
                tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
                save_file({"features": torch.cat(rows)}, str(tmp), metadata={"keys": json.dumps(keys)})
                os.replace(tmp, f)
                log.info(
                    "feature cache %s/%s: %d samples (%d distinct inputs) in %.1fs",
                    self.dir.name,
                    split,
                    len(keys),
                    len(seen),
                    time.perf_counter() - t0,
                )
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                keys = json.loads(fh.metadata()["keys"])
            self.feats[split] = load_file(str(f))["features"]
            self.tables[split] = {k: i for i, k in enumerate(keys)}

    def lookup(self, split: str, keys: list[str]) -> torch.Tensor:
        table = self.tables[split]
        try:
            idx = torch.tensor([table[k] for k in keys])
        except KeyError as e:
            raise KeyError(
                f"feature cache {self.dir}: sample key {e.args[0]!r} of split {split!r} missing; "
                "delete the cache directory to rebuild it"
            ) from None
        return self.feats[split][idx]


def input_row_digests(inputs: Any) -> list[bytes]:
    """One digest per batch row of an encoder's inputs (a tensor, or a dict of tensors with an optional
    ``attention_mask``): rows with equal digests hold equal inputs. Padding is excluded, so the same text padded to
    different lengths in different batches gets the same digest."""
    import hashlib

    if not isinstance(inputs, dict):
        inputs = {"x": inputs}
    mask = inputs.get("attention_mask")
    n = next(iter(inputs.values())).shape[0]
    out = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=16)
        keep = mask[i].bool() if mask is not None else None
        for k in sorted(inputs):
            v = inputs[k][i]
            if keep is not None and v.shape[:1] == keep.shape:
                v = v[keep]
            h.update(f"{k}:{v.dtype}:{tuple(v.shape)}|".encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        out.append(h.digest())
    return out
