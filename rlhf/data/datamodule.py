"""LightningDataModule turning `PreferenceSplits` into token batches for SFT, RM, PPO or DPO.

Prompt and response are tokenised separately and concatenated, exactly as the policy sees
them at generation time (prompt tokens, then sampled tokens), so SFT, reward-model and PPO
inputs agree on where the response starts. Tokenisation happens once in `setup`.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from rlhf.data.pairs import PreferencePair, PreferenceSplits, UnpairedExample, unpair
from rlhf.data.sampler import ResumableShuffleSampler

MODES = ("sft", "rm", "prompts", "pairs", "unpaired")
IGNORE_INDEX = -100  # torch cross-entropy's ignore_index


class _ListDataset(Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _pad(seqs: list[list[int]], value: int, length: int, left: bool = False) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            if left:
                out[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
            else:
                out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _mask(seqs: list[list[int]], length: int, left: bool = False) -> torch.Tensor:
    return _pad([[1] * len(s) for s in seqs], 0, length, left)


@dataclass
class _Collate:
    """Pads a list of tokenised examples; a class (not a closure) so workers can pickle it."""

    mode: str
    pad_id: int

    def __call__(self, items: list[dict]) -> dict:
        if self.mode == "sft":
            ids = [x["input_ids"] for x in items]
            n = max(map(len, ids))
            return {
                "input_ids": _pad(ids, self.pad_id, n),
                "attention_mask": _mask(ids, n),
                "labels": _pad([x["labels"] for x in items], IGNORE_INDEX, n),
            }
        if self.mode == "rm":
            chosen = [x["chosen_input_ids"] for x in items]
            rejected = [x["rejected_input_ids"] for x in items]
            # One common length so a model can score chosen and rejected in a single forward.
            n = max(map(len, chosen + rejected))
            return {
                "chosen_input_ids": _pad(chosen, self.pad_id, n),
                "chosen_attention_mask": _mask(chosen, n),
                "rejected_input_ids": _pad(rejected, self.pad_id, n),
                "rejected_attention_mask": _mask(rejected, n),
            }
        if self.mode == "pairs":
            seqs = [x[f"{side}_input_ids"] for side in ("chosen", "rejected") for x in items]
            n = max(map(len, seqs))  # one width: the policy scores chosen and rejected in one forward
            out = {"index": torch.tensor([x["index"] for x in items], dtype=torch.long)}
            for side in ("chosen", "rejected"):
                ids = [x[f"{side}_input_ids"] for x in items]
                out.update({f"{side}_input_ids": _pad(ids, self.pad_id, n), f"{side}_attention_mask": _mask(ids, n),
                            f"{side}_labels": _pad([x[f"{side}_labels"] for x in items], IGNORE_INDEX, n)})
            return out
        if self.mode == "unpaired":
            ids = [x["input_ids"] for x in items]
            n = max(map(len, ids))
            return {"index": torch.tensor([x["index"] for x in items], dtype=torch.long),
                    "input_ids": _pad(ids, self.pad_id, n), "attention_mask": _mask(ids, n),
                    "labels": _pad([x["labels"] for x in items], IGNORE_INDEX, n),
                    "label": torch.tensor([x["label"] for x in items], dtype=torch.bool)}
        # Left padding: generation appends to the right, so every prompt must end at the last column.
        ids = [x["input_ids"] for x in items]
        n = max(map(len, ids))
        return {
            "input_ids": _pad(ids, self.pad_id, n, left=True),
            "attention_mask": _mask(ids, n, left=True),
            "prompt": [x["prompt"] for x in items],
        }


class PreferenceDataModule(pl.LightningDataModule):
    """Batches for one stage: mode "sft" (prompt + chosen + eos, loss on the response only),
    "rm" (chosen/rejected sequences, no eos), "prompts" (left-padded prompts for PPO) or "pairs"
    (DPO: chosen and rejected each as in sft mode, with labels, right-padded to one common width,
    plus "index", the pair's position in its split, for per-pair caches such as reference log-probs)
    or "unpaired" (KTO: one response per row as in sft mode, with "label" True for desirable and
    "index"; trains on `splits.unpaired` when given, else on the train pairs unpaired; validates on
    the validation pairs unpaired).

    Prompts keep their LAST `max_prompt_length` tokens (the final question matters most);
    responses keep their FIRST `max_response_length` tokens. In sft mode eos counts toward
    `max_response_length` and is dropped when the response had to be cut, so the model never
    learns to stop mid-sentence; pairs mode treats both of its responses the same way.
    """

    def __init__(
        self,
        splits: PreferenceSplits,
        tokenizer,
        mode: str,
        batch_size: int,
        max_prompt_length: int = 64,
        max_response_length: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if max_prompt_length <= 0 or max_response_length <= 0:
            raise ValueError(
                f"max_prompt_length and max_response_length must be positive, "
                f"got {max_prompt_length} and {max_response_length}"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos token")
        self.splits = splits
        self.tokenizer = tokenizer
        self.mode = mode
        self.batch_size = batch_size
        self.max_prompt_length = max_prompt_length
        self.max_response_length = max_response_length
        self.seed = seed
        self.num_workers = num_workers
        self.eos_id = tokenizer.eos_token_id
        self.train_dataset: _ListDataset | None = None
        self.val_dataset: _ListDataset | None = None
        self._resume_position: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint
        self._train_sampler: ResumableShuffleSampler | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:  # Lightning calls setup per stage; tokenise only once
            if self.mode == "unpaired":
                train = self.splits.unpaired if self.splits.unpaired is not None else unpair(self.splits.train)
                self.train_dataset = _ListDataset(self._encode_unpaired(train))
                self.val_dataset = _ListDataset(self._encode_unpaired(unpair(self.splits.val)))
                return
            self.train_dataset = _ListDataset(self._encode(self.splits.train))
            self.val_dataset = _ListDataset(self._encode(self.splits.val))

    def _tok(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _encode(self, pairs: list[PreferencePair]) -> list[dict]:
        prompts = [p[-self.max_prompt_length:] for p in self._tok([x.prompt for x in pairs])]
        if self.mode == "prompts":
            return [{"input_ids": ids, "prompt": x.prompt} for ids, x in zip(prompts, pairs)]
        cut = self.max_response_length
        if self.mode == "sft":
            items = []
            for ids, resp in zip(prompts, self._tok([x.chosen for x in pairs])):
                resp = (resp + [self.eos_id])[:cut]
                items.append({"input_ids": ids + resp, "labels": [IGNORE_INDEX] * len(ids) + resp})
            return items
        if self.mode == "pairs":
            items = []
            for i, (p, c, r) in enumerate(zip(prompts, self._tok([x.chosen for x in pairs]),
                                              self._tok([x.rejected for x in pairs]))):
                item = {"index": i}
                for side, resp in (("chosen", c), ("rejected", r)):
                    # eos as in sft mode: DPO then also learns where a preferred response ends.
                    resp = (resp + [self.eos_id])[:cut]
                    item[f"{side}_input_ids"] = p + resp
                    item[f"{side}_labels"] = [IGNORE_INDEX] * len(p) + resp
                items.append(item)
            return items
        chosen = self._tok([x.chosen for x in pairs])
        rejected = self._tok([x.rejected for x in pairs])
        return [
            {"chosen_input_ids": p + c[:cut], "rejected_input_ids": p + r[:cut]}
            for p, c, r in zip(prompts, chosen, rejected)
        ]

    def _encode_unpaired(self, examples: list[UnpairedExample]) -> list[dict]:
        prompts = [p[-self.max_prompt_length:] for p in self._tok([x.prompt for x in examples])]
        items = []
        for i, (p, resp, ex) in enumerate(zip(prompts, self._tok([x.completion for x in examples]), examples)):
            resp = (resp + [self.eos_id])[:self.max_response_length]  # eos as in sft and pairs modes
            items.append({"index": i, "input_ids": p + resp, "labels": [IGNORE_INDEX] * len(p) + resp,
                          "label": ex.label})
        return items

    def _loader(self, dataset: _ListDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            self.setup()
            dataset = self.train_dataset if shuffle else self.val_dataset
        sampler = None
        if shuffle:
            trainer = self.trainer
            world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            labels = [x["label"] for x in dataset.items] if self.mode == "unpaired" else None
            sampler = ResumableShuffleSampler(len(dataset), self.seed, world, rank, labels)
            if self._resume_position is not None:
                epoch, batches = self._resume_position
                sampler.resume_at(epoch, batches * self.batch_size)
            self._train_sampler = sampler
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # PPO splits each rollout batch into equal minibatches: a short last batch would not divide;
            # KTO's could lack one of its two classes.
            drop_last=shuffle and self.mode in ("prompts", "unpaired"),
            collate_fn=_Collate(self.mode, self.eos_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def ordered_loader(self, split: str = "train", rank: int = 0, world: int = 1) -> DataLoader:
        """Every `world`-th example of `split` from `rank` on, in dataset order, none dropped: one pass
        that caches a value per example (DPO's reference log-probs), shared out over the ranks."""
        self.setup()
        dataset = self.train_dataset if split == "train" else self.val_dataset
        return DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=self.batch_size,
                          collate_fn=_Collate(self.mode, self.eos_id), num_workers=self.num_workers)

    # Data position in checkpoints: Lightning saves and restores these with the trainer state.
    def state_dict(self) -> dict:
        trainer = self.trainer
        if trainer is None:
            return {}
        loop = trainer.fit_loop.epoch_loop
        return {"epoch": trainer.current_epoch, "batches_done": loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume_position = (state["epoch"], state["batches_done"])

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)
