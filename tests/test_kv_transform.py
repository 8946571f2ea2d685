"""tq_deploy.models.kv_transform: generated calibration texts are seeded samples of the model."""

from __future__ import annotations

import torch

from tq_deploy.models.kv_transform import generated_texts
from tq_deploy.reference.llama import DecoderConfig, LlamaDecoder

CONFIG = DecoderConfig(vocab_size=80, hidden_size=48, intermediate_size=96, num_layers=2, num_q_heads=6,
                       num_kv_heads=2, head_dim=16, block_size=4, k_bits=3, v_bits=2, cache="float32",
                       attention_bias=True)


def random_decoder(config: DecoderConfig, seed: int = 0) -> LlamaDecoder:
    gen = torch.Generator().manual_seed(seed)
    decoder = LlamaDecoder(config).eval()
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return decoder


def test_generated_texts_are_seeded_samples_of_the_model():
    decoder = random_decoder(CONFIG)
    texts = generated_texts(decoder, 3, 12, first_token=1, seed=2)
    assert len(texts) == 3 and all(len(t) == 12 and t[0] == 1 for t in texts)
    assert all(0 <= x < CONFIG.vocab_size for t in texts for x in t)
    assert texts == generated_texts(decoder, 3, 12, first_token=1, seed=2)
    assert texts != generated_texts(decoder, 3, 12, first_token=1, seed=3)
    assert len({tuple(t) for t in texts}) > 1
