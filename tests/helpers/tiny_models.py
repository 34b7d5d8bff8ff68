"""Tiny CLIP models built in-process with random weights: no downloads, CPU, milliseconds."""

from __future__ import annotations

import functools

import open_clip
import torch
from torch import nn

EMBED_DIM = 32
IMAGE_SIZE = 32
CONTEXT = 16
HF_VOCAB = 99
# Special tokens inside the tiny vocabulary (transformers' defaults, 49406/49407, lie outside it and
# make the config warn). eos_token_id=2 selects CLIP's legacy pooling: the position of the largest
# token id, so the random ids from hf_tokens pool at a well-defined position.
HF_SPECIAL_TOKENS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)


@functools.cache
def tokenizer():
    """open_clip's bundled BPE tokenizer (works offline), short context for speed.

    Built once (reading the BPE vocabulary takes about half a second) and shared: it holds no state
    but a cache of encoded words.
    """
    return open_clip.SimpleTokenizer(context_length=CONTEXT)


def open_clip_model(seed: int = 0, *, siglip: bool = False) -> nn.Module:
    """A 2-layer ViT / 2-layer text transformer open_clip CLIP (or CustomTextCLIP with a logit bias)."""
    torch.manual_seed(seed)
    vision = open_clip.CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=IMAGE_SIZE)
    text = open_clip.CLIPTextCfg(context_length=CONTEXT, vocab_size=49408, width=32, heads=2, layers=2)
    if siglip:
        model = open_clip.CustomTextCLIP(
            EMBED_DIM, vision, text, init_logit_scale=2.3, init_logit_bias=-1.5
        )
    else:
        model = open_clip.CLIP(EMBED_DIM, vision, text)
    return model.eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def hf_clip_model(seed: int = 0) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CONTEXT, **HF_SPECIAL_TOKENS),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=EMBED_DIM,
    )
    return CLIPModel(config).eval()


def hf_siglip_model(seed: int = 0) -> nn.Module:
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    config = SiglipConfig(
        text_config=dict(vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CONTEXT, **HF_SPECIAL_TOKENS),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
    )
    return SiglipModel(config).eval()


def hf_tokens(k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, HF_VOCAB, (k, 8), generator=g)


class FakeOpenAICLIP(nn.Module):
    """Shaped like OpenAI's ``clip.model.CLIP``: ``encode_image``, ``encode_text``, ``logit_scale``, ``dtype``.

    Its ``__module__`` is set to ``clip.model`` so that backend detection sees it as OpenAI's.
    ``half=True`` makes its encoders return fp16, as OpenAI's models do on CUDA.
    """

    def __init__(self, seed: int = 0, half: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.visual = nn.Sequential(nn.Flatten(), nn.Linear(3 * IMAGE_SIZE * IMAGE_SIZE, EMBED_DIM))
        self.visual.output_dim = EMBED_DIM
        self.token_embedding = nn.Embedding(49408, EMBED_DIM)
        self.text_projection = nn.Parameter(torch.randn(EMBED_DIM, EMBED_DIM) / EMBED_DIM**0.5)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))
        self.half_outputs = half

    @property
    def dtype(self):
        return torch.float16 if self.half_outputs else torch.float32

    def encode_image(self, image):
        out = self.visual(image.float())
        return out.half() if self.half_outputs else out

    def encode_text(self, text):
        out = self.token_embedding(text).mean(1) @ self.text_projection
        return out.half() if self.half_outputs else out


FakeOpenAICLIP.__module__ = "clip.model"


def _clip_package():
    """OpenAI's ``clip`` package (pip ``openai-clip``), imported without its pkg_resources deprecation warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import clip
        import clip.model
    return clip


def openai_clip_model(seed: int = 0, *, half: bool = False) -> nn.Module:
    """OpenAI's own ``clip.model.CLIP`` at a tiny size, random weights: 2-layer ViT (one 64-wide head), 2-layer text.

    ``half=True`` applies ``clip.model.convert_weights`` as ``clip.load`` does on CUDA: the
    linear, convolution and attention weights become fp16 (LayerNorms, embeddings and the
    logit scale stay fp32), and the encoders return fp16. This torch runs that on CPU too.
    """
    clip = _clip_package()
    torch.manual_seed(seed)
    model = clip.model.CLIP(
        embed_dim=EMBED_DIM, image_resolution=IMAGE_SIZE, vision_layers=2, vision_width=64, vision_patch_size=8,
        context_length=CONTEXT, vocab_size=49408, transformer_width=32, transformer_heads=2, transformer_layers=2,
    )
    if half:
        clip.model.convert_weights(model)
    return model.eval()


def openai_tokenizer():
    """``clip.tokenize`` at the tiny models' context length."""
    return functools.partial(_clip_package().tokenize, context_length=CONTEXT)


class GenericDualEncoder(nn.Module):
    """Any module with encode_image / encode_text, and no logit_scale."""

    def __init__(self, dim: int = 24):
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = nn.Linear(3 * IMAGE_SIZE * IMAGE_SIZE, dim)
        self.text_embed = nn.Embedding(100, dim)

    def encode_image(self, images):
        return self.image_proj(images.flatten(1))

    def encode_text(self, tokens):
        return self.text_embed(tokens).mean(1)


HF_WORDS = ("[BOS]", "[PAD]", "[EOS]", "[UNK]", "a", "photo", "drawing", "of", "the", ".",
            "cat", "dog", "bird", "fish", "car", "tree")


def hf_tokenizer():
    """A word-level transformers tokenizer over ``HF_WORDS``, built offline.

    Its ids lie inside the tiny vocabulary and its special tokens are ``HF_SPECIAL_TOKENS``'s.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(HF_WORDS)}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, bos_token="[BOS]", pad_token="[PAD]",
                                   eos_token="[EOS]", unk_token="[UNK]")


def train_steps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, *,
                lr: float = 1e-2, weight_decay: float = 0.0) -> list[float]:
    """``steps`` AdamW steps of ``F.cross_entropy(logits, labels) + model.regularization()``; the losses."""
    model.train()
    optimiser = torch.optim.AdamW(model.trainable_parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(images), labels) + model.regularization()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    model.eval()
    return losses
