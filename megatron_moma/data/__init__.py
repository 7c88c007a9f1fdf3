"""Mixed-modal data: the vocabulary layout, image codes, JSON-lines records, the preprocessing tool
(`moma-preprocess`), the training dataset, and the bundled sample corpus.

Modules: `vocabulary` (modality id ranges, sentinels, the JSON sidecar), `image_codes` (code
files and their mapping into the vocabulary), `tokenizers` (byte-level and Hugging Face),
`records` (records -> documents), `dataset_writer` (indexed datasets written all-or-nothing),
`preprocess` (the command line tool), `dataset` (the GPTDataset for training), `sample_corpus`
(the digits corpus).
"""
