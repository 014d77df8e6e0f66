"""The M-step's GPU kernel switches, as far as a CPU can check them: Liger's Triton kernels and SDPA's cuDNN
backend cannot run here, but binding them to the model and to torch can, and that is what breaks when
transformers or liger-kernel move. Run in a subprocess: Liger patches transformers' modules for the whole
process (rotary embeddings included), which would leave Triton kernels in every later CPU test."""
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
