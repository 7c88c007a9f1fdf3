"""Generate images from captions with a model trained on `moma-sample-data --corpus real`.

For each label the prompt is the caption template filled in (default "an emoji of {label}:", one
of the corpus's caption-then-image templates) in byte-level tokens, then begin-of-image; the
model (a Hugging Face folder written by `moma-convert export-hf`) samples the image's codes one
at a time with its logits restricted to the image range of the vocabulary, and the corpus's
patch codebook decodes them. Writes to `--output-dir`: `{n}_{label}_{sample}.png` (scaled up
`--zoom` times), `reference_{n}_{label}_{vendor}.png` (the corpus's own images of that label,
decoded from their codes: what the codebook can show at best), and `generated.md`, a table of
them beside their captions.

    python examples/generate_images.py --hf-model HF_DIR --corpus-dir CORPUS \\
        --vocabulary DATA_PREFIX.vocab.json --labels "red heart" "dog face" --output-dir out
"""

import argparse
import json
import os
import sys

import numpy
import torch

from megatron_moma.data import patch_codebook, tokenize_images
from megatron_moma.data.tokenizers import ByteLevelTokenizer
from megatron_moma.data.vocabulary import read_sidecar


def sample_codes(model, prompt, first_id, last_id, codes, generator, temperature):
    """[len(prompt)] ids -> [codes] image codes sampled with logits outside the image range
    removed (at temperature 0: the most likely code)."""
    ids = torch.tensor([prompt])
    sampled = []
    for _ in range(codes):
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0, -1, first_id:last_id + 1].float()
        if temperature == 0:
            code = int(logits.argmax())
        else:
            probabilities = torch.softmax(logits / temperature, dim=-1)
            code = int(torch.multinomial(probabilities, 1, generator=generator))
        sampled.append(code)
        ids = torch.cat([ids, torch.tensor([[first_id + code]])], dim=1)
    return numpy.array(sampled)


def references(corpus_dir, label):
    """The corpus's code files of `label`, by vendor."""
    found = {}
    with open(os.path.join(corpus_dir, "real.jsonl"), encoding="utf-8") as records:
        for line in records:
            record = json.loads(line)
            if record.get("label") == label:
                image = next(s["image"] for s in record["text"] if "image" in s)
                found[record["source"]] = os.path.join(corpus_dir, image)
    return found


def zoomed(pixels, zoom):
    return pixels.repeat(zoom, axis=0).repeat(zoom, axis=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf-model", required=True)
    parser.add_argument("--corpus-dir", required=True, help="moma-sample-data --corpus real's folder")
    parser.add_argument("--vocabulary", required=True, help="the preprocessed data's .vocab.json")
    parser.add_argument("--labels", nargs="+", required=True)
    parser.add_argument("--template", default="an emoji of {label}:")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--zoom", type=int, default=3)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.hf_model, trust_remote_code=True,
                                                 local_files_only=True).eval()
    codebook = patch_codebook.load(os.path.join(args.corpus_dir, "codebook.npz"))
    layout = read_sidecar(args.vocabulary)
    image_range = next(r for r in layout.ranges if r.name == "image")
    first_id, last_id = image_range.first_id, image_range.last_id
    codes_per_image = codebook.grid ** 2
    tokenizer = ByteLevelTokenizer()
    generator = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    rows = ["| caption | generated | the corpus's images (codebook-decoded) |", "|---|---|---|"]
    for number, label in enumerate(args.labels):
        caption = args.template.format(label=label)
        prompt = tokenizer.tokenize(caption) + [layout.begin_of_image]
        slug = f"{number}_{label.replace(' ', '_').replace(':', '')}"
        generated = []
        for sample in range(args.samples):
            codes = sample_codes(model, prompt, first_id, last_id, codes_per_image, generator,
                                 args.temperature)
            name = f"{slug}_{sample}.png"
            tokenize_images.write_png(os.path.join(args.output_dir, name),
                                      zoomed(codebook.decode(codes[None])[0], args.zoom))
            generated.append(name)
        shown = []
        for vendor, path in sorted(references(args.corpus_dir, label).items()):
            name = f"reference_{slug}_{vendor}.png"
            pixels = codebook.decode(numpy.load(path)[None])[0]
            tokenize_images.write_png(os.path.join(args.output_dir, name), zoomed(pixels, args.zoom))
            shown.append(name)
        rows.append(f"| `{caption}` | " + " ".join(f"![]({n})" for n in generated) + " | "
                    + " ".join(f"![]({n})" for n in shown) + " |")
        print(f"{caption} -> {', '.join(generated)}", file=sys.stderr)
    with open(os.path.join(args.output_dir, "generated.md"), "w", encoding="utf-8") as out:
        out.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
