"""The M-step's GPU kernel switches, as far as a CPU can check them: Liger's Triton kernels and SDPA's cuDNN
backend cannot run here, but binding them to the model and to torch can, and that is what breaks when
transformers or liger-kernel move. Run in a subprocess: Liger patches transformers' modules for the whole
process (rotary embeddings included), which would leave Triton kernels in every later CPU test."""
import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from restem_ray.training import apply_liger_kernel, set_gpu_attention

    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    # first: Liger's full patch also swaps transformers' module classes for the whole process
    model = Qwen2ForCausalLM(Qwen2Config(**shape))
    apply_liger_kernel(model, loss_only=True)  # compiled layers: Liger's loss, the layers left to torch.compile
    layer = model.model.layers[0]
    print("loss only", model.forward.__qualname__, layer.input_layernorm.forward.__qualname__,
          layer.mlp.forward.__qualname__)
    for config, model_cls in ((LlamaConfig, LlamaForCausalLM), (Qwen2Config, Qwen2ForCausalLM)):
        model = model_cls(config(**shape))
        before = model.forward.__qualname__
        apply_liger_kernel(model)
        layer = model.model.layers[0]
        print(model.config.model_type, before, "->", model.forward.__module__ + "." + model.forward.__qualname__,
              model.model.norm.forward.__qualname__, layer.input_layernorm.forward.__qualname__,
              layer.post_attention_layernorm.forward.__qualname__, layer.mlp.forward.__qualname__)
    try:
        apply_liger_kernel(GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2)))
    except RuntimeError as e:
        print("ERROR", e)
    set_gpu_attention(False)
    print("cudnn", torch.backends.cuda.cudnn_sdp_enabled())
    set_gpu_attention(True)
    print("cudnn", torch.backends.cuda.cudnn_sdp_enabled())
""")


def test_liger_kernels_bind_to_llama_and_qwen2_and_refuse_other_models_in_one_line():
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    # with compiled layers only the loss is Liger's: the layers keep transformers' norms and MLP for the compiler
    assert lines[0] == "loss only lce_forward Qwen2RMSNorm.forward Qwen2MLP.forward"
    lines = lines[1:]
    # the model's forward is Liger's (the loss from hidden states, no logits), and every norm and MLP is fused
    assert lines[0] == ("llama LlamaForCausalLM.forward -> liger_kernel.transformers.model.llama.lce_forward "
                        "LigerRMSNorm.forward LigerRMSNorm.forward LigerRMSNorm.forward LigerSwiGLUMLP.forward")
    assert lines[1] == ("qwen2 Qwen2ForCausalLM.forward -> liger_kernel.transformers.model.qwen2.lce_forward "
                        "LigerRMSNorm.forward LigerRMSNorm.forward LigerRMSNorm.forward LigerSwiGLUMLP.forward")
    # Liger itself only logs for a model it has no kernels for and trains without them
    assert lines[2].startswith("ERROR training.liger_kernel: Liger has no kernels for model type 'gpt2' (it has: ")
    assert "llama" in lines[2] and "qwen2" in lines[2]
    assert lines[3:] == ["cudnn False", "cudnn True"]


def test_compiling_a_model_without_decoder_layers_is_one_line():
    import pytest
    import torch

    from restem_ray.training import compile_decoder_layers

    class Custom(torch.nn.Module):
        config = type("Config", (), {"model_type": "custom"})()

        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(RuntimeError) as e:
        compile_decoder_layers(Custom())
    assert str(e.value) == ("training.compile_layers: no decoder layers (transformers' GradientCheckpointingLayer) "
                            "in model type 'custom'")


ACCUM_SCRIPT = textwrap.dedent("""
    import functools
    import json

    import torch
    import liger_kernel.transformers.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from restem_ray.config import TrainingConfig
    from restem_ray.sft import forward
    from restem_ray.training import apply_liger_kernel, loss_kwargs

    seen = []
    triton = F.liger_fused_linear_cross_entropy

    @functools.wraps(triton)  # Liger filters its keyword arguments by this signature
    def reference(input, weight, target, *, ignore_index=-100, reduction="mean", accum_dtype=None, **_):
        # the Triton kernel cannot run on a CPU: the same loss, and a record of what the M-step asked for
        seen.append(accum_dtype)
        return torch.nn.functional.cross_entropy(input @ weight.T, target, ignore_index=ignore_index,
                                                 reduction=reduction)

    F.liger_fused_linear_cross_entropy = reference
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(0, 300, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels}
    plain = forward(model.train(), batch).loss
    apply_liger_kernel(model, loss_only=True)
    cfg = TrainingConfig(use_gpu=True, liger_kernel=True)
    fused = forward(model, batch | loss_kwargs(cfg)).loss
    print(json.dumps({"seen": [str(d) for d in seen], "plain": float(plain), "fused": float(fused),
                      "off": list(loss_kwargs(TrainingConfig()))}))
""")


def test_the_liger_loss_sums_lm_head_gradients_in_fp32():
    """Liger's fused loss adds lm_head's gradient over ~128 chunks of tokens; left to its default it does so
    in bf16. The M-step's forward must carry accum_dtype through the model's forward to Liger's loss."""
    p = subprocess.run([sys.executable, "-c", ACCUM_SCRIPT], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.splitlines()[-1])
    assert out["seen"] == ["torch.float32"]  # Liger's loss was called once, asked for fp32 sums
    assert abs(out["plain"] - out["fused"]) < 1e-5  # the same loss through Liger's path
    assert out["off"] == []  # without Liger the forward is unchanged
