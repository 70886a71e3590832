"""Tiny random decoder-only models built from configs (no download), for fast unit tests."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

VOCAB = 128

CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=8),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=32),
}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = CONFIGS[arch]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_ids(n: int = 4, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# Families of the architecture matrix (tests/test_architectures.py, benchmarks/architectures.py): tiny random
# models from transformers' own config classes. Windows of 16 tokens are longer than the 4-token sliding
# windows, so sliding and full layers see different masks, as at real lengths.
SLIDING = 4
_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


def _family_configs():
    import transformers as t

    return {
        "llama": lambda: t.LlamaConfig(**_SMALL, num_hidden_layers=2),
        "qwen2": lambda: t.Qwen2Config(**_SMALL, num_hidden_layers=2),
        "qwen3": lambda: t.Qwen3Config(**_SMALL, num_hidden_layers=2, head_dim=8),
        "mistral": lambda: t.MistralConfig(**_SMALL, num_hidden_layers=2, sliding_window=SLIDING),
        "phi3": lambda: t.Phi3Config(**_SMALL, num_hidden_layers=2, pad_token_id=0),
        "opt": lambda: t.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=32),
        "gemma2": lambda: t.Gemma2Config(**_SMALL, num_hidden_layers=4, head_dim=8, sliding_window=SLIDING),
        # Gemma-3: sliding and global layers with different rotary bases (local 10k, global 1M)
        "gemma3": lambda: t.Gemma3TextConfig(**_SMALL, num_hidden_layers=4, head_dim=8, sliding_window=SLIDING,
                                             layer_types=["sliding_attention", "full_attention"] * 2),
        "mixtral": lambda: t.MixtralConfig(**_SMALL, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(**_SMALL, num_hidden_layers=2, head_dim=8, num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=32),
        "gpt_oss": lambda: t.GptOssConfig(**_SMALL, num_hidden_layers=2, head_dim=8, num_local_experts=4,
                                          num_experts_per_tok=2, sliding_window=SLIDING),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(**_SMALL, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32, shared_expert_intermediate_size=32),
        # DeepSeek-V3: multi-head latent attention, a dense first block, then routed + shared experts
        "deepseek_v3": lambda: t.DeepseekV3Config(**{**_SMALL, "num_key_value_heads": 4}, num_hidden_layers=3,
                                                  first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                                                  moe_intermediate_size=32, n_shared_experts=1, n_group=1,
                                                  topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                                                  qk_nope_head_dim=8, v_head_dim=8),
        # Qwen3-Next: hybrid linear attention (gated delta rule, PyTorch reference kernels on a CPU) and full
        # attention layers, MoE with a shared expert
        "qwen3_next": lambda: t.Qwen3NextConfig(**_SMALL, num_hidden_layers=4, head_dim=8, num_experts=4,
                                                num_experts_per_tok=2, moe_intermediate_size=32,
                                                shared_expert_intermediate_size=32, linear_num_value_heads=4,
                                                linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                                                layer_types=["linear_attention", "full_attention"] * 2),
    }


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3", "opt", "gemma2", "gemma3", "mixtral", "qwen3_moe", "gpt_oss",
            "qwen2_moe", "deepseek_v3", "qwen3_next"]


def family_model(family: str, seed: int = 0):
    """A tiny random model of ``family`` (see FAMILIES), eager-free: the default attention backend (SDPA)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _family_configs()[family]()
    cfg.use_cache = False
    return AutoModelForCausalLM.from_config(cfg).eval()
