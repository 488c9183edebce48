"""Which builder a dataset name calls, and how a model changes what it builds (BERT: WordPiece, masked-LM)."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from tyingrun.config import DatasetConfig, ModelConfig
from tyingrun.data.lm import LMData, build_lm_data
from tyingrun.data.reasoning import ReasoningData, build_reasoning_data
from tyingrun.data.reasoning_tasks import REASONING_TASKS
from tyingrun.data.text import CORPUS_LOADERS, Corpus
from tyingrun.data.vision import IMAGE_LOADERS, IMAGE_SIZES, VisionData, build_vision_data

TEXT_DATASETS = tuple(CORPUS_LOADERS)
IMAGE_DATASETS = tuple(IMAGE_LOADERS)
# The data registry: every dataset and the kind of data it is ("lm": token blocks, "vision": labelled images,
# "reasoning": generated prompts scored by their answers).
DATASET_TASKS = {**dict.fromkeys(TEXT_DATASETS, "lm"), **dict.fromkeys(IMAGE_DATASETS, "vision"),
                 **dict.fromkeys(REASONING_TASKS, "reasoning")}
DATASET_IMAGE_SIZES = IMAGE_SIZES


def build_dataset(dataset: DatasetConfig, model: ModelConfig, corpus: Optional[Corpus] = None,
                  seed: int = 0) -> LMData | VisionData | ReasoningData:
    """The splits of ``dataset.name`` prepared as ``model`` trains on them.

    ``corpus`` is the text corpus already loaded by ``load_corpus(dataset)``, to build from without loading it
    again; ``seed`` (train.seed) is the run seed whose streams generate a reasoning task's instances. Whether the
    model suits the dataset is the caller's check.
    """
    if DATASET_TASKS[dataset.name] == "vision":
        return build_vision_data(dataset)
    if DATASET_TASKS[dataset.name] == "reasoning":
        return build_reasoning_data(dataset, seed)
    lm_dataset, masked_lm = language_model_settings(dataset, model)
    return build_lm_data(lm_dataset, masked_lm=masked_lm, corpus=corpus)


def language_model_settings(dataset: DatasetConfig, model: ModelConfig) -> tuple[DatasetConfig, bool]:
    """The dataset settings ``model`` trains with, and whether its batches are masked-LM ones.

    BERT's own WordPiece replaces the default BPE (a tokenizer the user names, gpt2 or tokenizer_path, is kept),
    and BERT trains masked-LM unless ``model.causal``.
    """
    bert = model.name == "bert"
    if bert and dataset.tokenizer == "bpe":
        dataset = replace(dataset, tokenizer="wordpiece")
    return dataset, bert and not model.causal
