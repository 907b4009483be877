"""A GGUF file of a tiny Llama (``tests.tiny_models.make_sentencepiece_model``), written with the gguf
package's GGUFWriter: no llama.cpp converter needed, and the tokenizer may be left out.

Both transformers (``gguf_file=``) and llama.cpp read it. Tensors are F32, laid out as llama.cpp's
converter lays them out (q/k rows permuted for its rotary embedding).
"""

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

PER_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_llama_gguf(model_dir: Path, out_file: Path, *, tokenizer: bool = True) -> Path:
    """``model_dir`` (a Llama with a SentencePiece ``tokenizer.model``) as an F32 GGUF file."""
    from gguf import GGUFWriter, LlamaFileType

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = model.config
    writer = GGUFWriter(str(out_file), "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(LlamaFileType.ALL_F32)
    if tokenizer:
        _add_sentencepiece(writer, model_dir / "tokenizer.model")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(cfg.num_hidden_layers):
        names |= {f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in PER_LAYER.items()}
    state = model.state_dict()
    for hf_name, gguf_name in names.items():
        data = state[hf_name].numpy()
        if gguf_name.endswith("attn_q.weight"):
            data = _permute(data, cfg.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def _add_sentencepiece(writer, model_file: Path) -> None:
    import sentencepiece as spm
    from gguf import TokenType

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    ids = range(sp.get_piece_size())
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i).encode() for i in ids])
    writer.add_token_scores([sp.get_score(i) for i in ids])
    writer.add_token_types([TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                            else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL for i in ids])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_pad_token_id(sp.pad_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (LlamaModel.permute in its converter)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))
