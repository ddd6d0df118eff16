"""Tasks (`data=`): HH-RLHF, the synthetic dialogues with their gold, the length trap, verifiable
arithmetic; the shared pair types, the task contract (`pairs.Task`) and the datamodule."""
from rlhf.data.arithmetic import Arithmetic
from rlhf.data.datamodule import PreferenceDataModule
from rlhf.data.hh import HHRLHF, read_hh_file, split_hh
from rlhf.data.length_trap import LengthTrap
from rlhf.data.pairs import (DataError, PreferencePair, PreferenceSplits, Task, drop_seen_prompts, prompt_overlap,
                             split_train_val)
from rlhf.data.synthetic import SyntheticPreferences, gold_reward, gold_reward_batch, prompt_topic

__all__ = [
    "Arithmetic",
    "LengthTrap",
    "Task",
    "DataError",
    "HHRLHF",
    "PreferenceDataModule",
    "PreferencePair",
    "PreferenceSplits",
    "SyntheticPreferences",
    "gold_reward",
    "drop_seen_prompts",
    "gold_reward_batch",
    "prompt_overlap",
    "prompt_topic",
    "read_hh_file",
    "split_hh",
    "split_train_val",
]
