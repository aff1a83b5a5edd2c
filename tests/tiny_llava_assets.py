"""A tiny LLaVA, with its tokenizer, processor and an image+text SFT dataset, for real fine-tuning frameworks.

Everything is built here, offline: no hub download. Used by ``tests/test_llamafactory.py`` and
``tests/test_msswift.py`` (and so by the recipes in ``docs/frameworks/``, which were run through those tests).

What ``llamafactory.train.tuner.run_exp`` reads (llamafactory 0.9.5, ``model/loader.py``, ``data/mm_plugin.py``):

- ``model_name_or_path``: ``AutoTokenizer`` + ``AutoProcessor`` + ``AutoConfig`` + the model class for the config
  (``LlavaForConditionalGeneration`` via ``AutoModelForImageTextToText``). The processor must be a real
  ``LlavaProcessor`` (LLaMA-Factory drops anything whose class name lacks "Processor"), with ``patch_size``,
  ``num_additional_image_tokens`` and ``vision_feature_select_strategy``, from which the ``llava`` template's
  plugin computes how many ``<image>`` tokens one image expands to: (32 // 8) ** 2 + 1 - 1 = 16 here, which is
  what the CLIP tower (16 patches + CLS, CLS dropped by the "default" strategy) produces.
- ``dataset_dir/dataset_info.json`` naming a ShareGPT-style JSON file with ``messages`` and ``images`` columns;
  image paths are relative to ``dataset_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The words of the llava template's system prompt and turns, and of our samples: a word-level vocabulary that
# covers them exactly keeps the tokenizer tiny and free of <unk> noise in the labels.
_TEMPLATE_TEXT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:"
)
_QUESTIONS = ["what colour is the square", "describe the picture", "is there a circle", "what do you see"]
_ANSWERS = ["a red square", "a green field with a blue sky", "no there is only a square", "a small yellow dot"]
_TEXT_ONLY = [("say hello", "hello there"), ("count to three", "one two three")]

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>", IMAGE_TOKEN]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [_TEMPLATE_TEXT, *_QUESTIONS, *_ANSWERS, *[w for pair in _TEXT_ONLY for w in pair]]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=256,
    )


def build_model(vocab_size: int, image_token_id: int, special_ids: dict[str, int], seed: int = 0) -> Any:
    """A tiny LLaVA (CLIP 32x32/8 -> 16 image tokens; Llama 64 wide, 2 layers), the sizes of
    ``gradguard.testing.models.tiny_llava`` (not imported here: that module needs transformers >= 5.2x for
    its MiniCPM-V 4.6 class, and LLaMA-Factory 0.9.5 pins transformers <= 5.6)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **special_ids,
        ),
        image_token_index=image_token_id,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=special_ids["pad_token_id"],
    )
    return LlavaForConditionalGeneration(config)


def build_model_dir(root: Path) -> Path:
    """Save model, tokenizer and processor into ``root/tiny-llava`` and return that path."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    out = root / "tiny-llava"
    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )
    special_ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("pad", "bos", "eos")}
    model = build_model(len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), special_ids)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_dataset_dir(root: Path, n: int = 8, text_only: int = 2) -> Path:
    """``root/data`` with ``dataset_info.json`` (dataset ``tiny_mm``), ``tiny_mm.json`` and the PNG images."""
    from PIL import Image

    out = root / "data"
    (out / "images").mkdir(parents=True, exist_ok=True)
    colours = [(200, 30, 30), (30, 160, 60), (40, 60, 200), (220, 200, 40)]
    rows: list[dict[str, Any]] = []
    for i in range(n):
        name = f"images/{i}.png"
        Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), colours[i % len(colours)]).save(out / name)
        q, a = _QUESTIONS[i % len(_QUESTIONS)], _ANSWERS[i % len(_ANSWERS)]
        rows.append(
            {
                "messages": [{"role": "user", "content": f"{IMAGE_TOKEN}{q}"}, {"role": "assistant", "content": a}],
                "images": [name],
            }
        )
    for q, a in _TEXT_ONLY[:text_only]:  # real instruction data mixes text-only samples in
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    (out / "tiny_mm.json").write_text(json.dumps(rows, indent=1))
    info = {
        "tiny_mm": {
            "file_name": "tiny_mm.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
    }
    (out / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return out


def sft_args(model_dir: Path, data_dir: Path, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    """``run_exp`` arguments for a few LoRA SFT steps on CPU: the keys of a LLaMA-Factory YAML, as a dict."""
    args: dict[str, Any] = {
        "stage": "sft",
        "do_train": True,
        "model_name_or_path": str(model_dir),
        "template": "llava",
        "dataset": "tiny_mm",
        "dataset_dir": str(data_dir),
        "cutoff_len": 96,
        "overwrite_cache": True,
        "preprocessing_num_workers": None,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 4,
        "freeze_vision_tower": False,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "max_steps": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    args.update(overrides)
    return args


def swift_dataset(root: Path, data_dir: Path) -> Path:
    """The same samples as ``build_dataset_dir`` as ms-swift's JSONL (``messages`` + absolute ``images`` paths)."""
    rows = json.loads((data_dir / "tiny_mm.json").read_text())
    out = root / "train.jsonl"
    with out.open("w") as f:
        for row in rows:
            if "images" in row:
                row["images"] = [str(data_dir / p) for p in row["images"]]
            f.write(json.dumps(row) + "\n")
    return out


def swift_args(model_dir: Path, dataset: Path, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    """``SftArguments`` for a few LoRA steps on CPU (the flags of ``swift sft``, as keyword arguments)."""
    args: dict[str, Any] = {
        "model": str(model_dir),
        "model_type": "llava1_5_hf",  # a local directory: ms-swift cannot infer its registry entry from a hub id
        "dataset": [str(dataset)],
        "split_dataset_ratio": 0.0,
        "tuner_type": "lora",
        "freeze_vit": False,
        "torch_dtype": "float32",
        "max_length": 96,
        "output_dir": str(output_dir),
        "add_version": False,
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,  # ms-swift otherwise picks one that makes a total batch of 16
        "learning_rate": 1.0e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "use_hf": True,  # Hugging Face hub conventions (offline here) rather than ModelScope's
        "check_model": False,  # else the trainer asks ModelScope's hub whether the local model is the latest
        "report_to": ["none"],
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    args.update(overrides)
    return args
