"""The fixed-prompt text context of the real presets: umT5-XXL encoding of the paper's prompt (StreamAvatar §3.2).

StreamAvatar fixes the text prompt to "a person is speaking and listening", so the text encoder runs once, here,
and the DiT reads the result from the zoo entry ``wan2.2-ti2v-5b.prompt-context`` (or a file). The encoding
follows Wan2.2 (``wan/modules/t5.py`` + ``text2video.py``, and diffusers' ``WanPipeline._get_t5_prompt_embeds``):
tokenize with the umT5 tokenizer to at most ``text_len`` = 512 tokens (EOS appended), run the encoder with the
attention mask, keep the hidden states of the real tokens only ``[L, 4096]``; the DiT zero-pads them to 512.

``make_text_context`` downloads the umT5-XXL encoder of the Diffusers layout of Wan2.2-TI2V-5B (about 11 GB, bf16
like Wan's ``models_t5_umt5-xxl-enc-bf16.pth``) when, and only when, it is run (``dystream zoo text-context``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["PROMPT", "encode_prompt_context", "make_text_context"]

PROMPT = "a person is speaking and listening"  # StreamAvatar §3.2
DIFFUSERS_REPO = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"  # tokenizer/ + text_encoder/ (UMT5EncoderModel)


@torch.no_grad()
def encode_prompt_context(encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """One tokenized prompt ``[1, N]`` (padded, mask ``[1, N]``) -> hidden states of its real tokens ``[L, D]``."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"encode_prompt_context: expected input_ids and attention_mask [1, N], got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    length = int(attention_mask.sum())
    if length == 0:
        raise ValueError("encode_prompt_context: the prompt has no tokens")
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden[0, :length].float().cpu()


def make_text_context(
    out: str | Path,
    prompt: str = PROMPT,
    repo: str = DIFFUSERS_REPO,
    revision: str | None = None,
    text_len: int = 512,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Encode ``prompt`` with the Wan2.2 umT5-XXL encoder and write ``out`` (safetensors, tensor ``context``)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, UMT5EncoderModel

    if revision is None:
        warnings.warn(
            f"make_text_context: {repo} is used at its current main revision (no pinned commit is known)", stacklevel=2
        )
    tokenizer = AutoTokenizer.from_pretrained(repo, subfolder="tokenizer", revision=revision)
    encoder = UMT5EncoderModel.from_pretrained(repo, subfolder="text_encoder", revision=revision, dtype=dtype)
    encoder.to(device).eval()
    batch = tokenizer(
        [prompt],
        padding="max_length",
        max_length=text_len,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    context = encode_prompt_context(encoder, batch.input_ids.to(device), batch.attention_mask.to(device))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "dystream.kind": "text-context",
        "prompt": prompt,
        "encoder": f"{repo}@{revision or 'main'} text_encoder ({str(dtype).removeprefix('torch.')})",
        "text_len": str(text_len),
    }
    save_file({"context": context.contiguous()}, str(out), metadata=metadata)
    return out
