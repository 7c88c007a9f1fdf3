"""Writing mixed-modal IndexedDatasets all-or-nothing, in partitions merged at the end.

For each JSON key the output is `{output_prefix}_{key}_document.bin/.idx` (megatron's indexed
dataset with `multimodal=True`: one mode per sequence) plus the vocabulary sidecar
`{output_prefix}_{key}_document.vocab.json`. Everything is first written into a temporary folder
beside the output; `commit` merges the partitions with megatron's `IndexedDatasetBuilder.add_index`
and renames each file into place, and leaving the `with` block by an exception deletes the folder,
so a failed run leaves no partial dataset and never touches existing files.
"""

import json
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Type

import numpy
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

from megatron_moma.data.records import EncodedDocument
from megatron_moma.data.vocabulary import (
    MODALITY_NAMES,
    VocabularyLayout,
    sidecar_path,
    write_sidecar,
)


def dataset_prefix(output_prefix: str, key: str) -> str:
    """Megatron-LM's output naming: `{prefix}_{key}_document`."""
    return f"{output_prefix}_{key}_document"


def rejected_path(output_prefix: str) -> str:
    """Where `--skip-bad` lists the rejected records (one JSON object per line)."""
    return f"{output_prefix}_rejected.jsonl"


class MixedModalDatasetWriter:
    """Collects documents for each JSON key into partitions; `commit` publishes them at once."""

    def __init__(self, output_prefix: str, json_keys: Sequence[str], dtype: Type[numpy.number]):
        self.output_prefix = output_prefix
        self.json_keys = tuple(json_keys)
        self.dtype = dtype
        output_dir = os.path.dirname(os.path.abspath(output_prefix))
        self.temp_dir = tempfile.mkdtemp(
            prefix=f".{os.path.basename(output_prefix)}.", suffix=".tmp", dir=output_dir
        )
        self.partition_prefixes: List[Dict[str, str]] = []
        self.builders: Dict[str, IndexedDatasetBuilder] = {}
        self.token_counts = {
            key: numpy.zeros(len(MODALITY_NAMES), dtype=numpy.int64) for key in self.json_keys
        }
        self.documents = 0

    def __enter__(self) -> "MixedModalDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def start_partition(self) -> None:
        """Close the current partition (if any) and open the next one."""
        self._finalize_partition()
        number = len(self.partition_prefixes)
        prefixes = {
            key: os.path.join(self.temp_dir, f"part{number:05d}_{key}") for key in self.json_keys
        }
        self.partition_prefixes.append(prefixes)
        self.builders = {
            key: IndexedDatasetBuilder(get_bin_path(prefix), dtype=self.dtype, multimodal=True)
            for key, prefix in prefixes.items()
        }

    def add(self, documents: Dict[str, EncodedDocument]) -> None:
        """Append one record's document to each key's dataset."""
        for key, document in documents.items():
            self.builders[key].add_document(
                torch.from_numpy(document.tokens), document.lengths, document.modes
            )
            numpy.add.at(self.token_counts[key], document.modes, document.lengths)
        self.documents += 1

    def commit(
        self, layout: VocabularyLayout, source: dict, rejected: Optional[List[dict]]
    ) -> List[str]:
        """Merge the partitions, write sidecars (and the rejected list), rename into place.

        Returns the paths written.
        """
        self._finalize_partition()
        staged = {}
        for key in self.json_keys:
            staged.update(self._merge(key))
            staged_sidecar = os.path.join(self.temp_dir, f"{key}.vocab.json")
            write_sidecar(staged_sidecar, layout, self._describe(key, source))
            staged[staged_sidecar] = sidecar_path(dataset_prefix(self.output_prefix, key))
        if rejected is not None:
            staged_rejected = os.path.join(self.temp_dir, "rejected.jsonl")
            with open(staged_rejected, "w", encoding="utf-8") as rejected_file:
                rejected_file.writelines(
                    json.dumps(entry, ensure_ascii=False) + "\n" for entry in rejected
                )
            staged[staged_rejected] = rejected_path(self.output_prefix)
        for staged_path, final_path in staged.items():
            os.replace(staged_path, final_path)
        return list(staged.values())

    def _finalize_partition(self) -> None:
        for key, builder in self.builders.items():
            builder.finalize(get_idx_path(self.partition_prefixes[-1][key]))
        self.builders = {}

    def _merge(self, key: str) -> Dict[str, str]:
        """Staged path -> final path of the key's .bin and .idx (partitions merged in order)."""
        final = dataset_prefix(self.output_prefix, key)
        parts = [prefixes[key] for prefixes in self.partition_prefixes]
        if len(parts) == 1:
            merged = parts[0]
        else:
            merged = os.path.join(self.temp_dir, f"merged_{key}")
            builder = IndexedDatasetBuilder(get_bin_path(merged), dtype=self.dtype, multimodal=True)
            for part in parts:
                builder.add_index(part)
            builder.finalize(get_idx_path(merged))
        return {
            get_bin_path(merged): get_bin_path(final),
            get_idx_path(merged): get_idx_path(final),
        }

    def _describe(self, key: str, source: dict) -> dict:
        tokens = {name: int(count) for name, count in zip(MODALITY_NAMES, self.token_counts[key])}
        return dict(source, json_key=key, documents=self.documents, tokens=tokens)
