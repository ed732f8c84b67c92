"""model.config_overrides: the embedded default's shape, set as run_clm's --config_overrides sets it,
with a message naming the pair at fault for each mistake."""

import pytest

from dft_ds import model as mdl
from dft_ds.checkpoint import resume_changes
from dft_ds.config import ConfigError, ModelConfig, load_config, to_dict
from dft_ds.errors import ModelError


class Tokenizer:
    """What the config needs of a tokenizer: its length and special ids."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 3

    def __len__(self):
        return 512


def build(text: str):
    return mdl.synthetic_config(ModelConfig(config_overrides=text), Tokenizer())


def test_the_pairs_shape_the_model_and_derived_fields_follow():
    config = build("hidden_size=64, num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1,"
                   "intermediate_size=128,rms_norm_eps=1e-6,tie_word_embeddings=true")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 2)
    assert (config.num_key_value_heads, config.intermediate_size, config.head_dim) == (1, 128, 32)
    assert config.rms_norm_eps == 1e-6 and isinstance(config.rms_norm_eps, float)
    assert config.tie_word_embeddings is True
    assert (config.vocab_size, config.eos_token_id) == (512, 2)  # still the tokenizer's


def test_empty_overrides_are_the_embedded_default():
    config = build("")
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (256, 4, 688)


@pytest.mark.parametrize("text,message", [
    ("hidden_size", "'hidden_size' is not key=value (expected e.g. hidden_size=64,num_hidden_layers=2)"),
    ("hidden_sise=64", "'hidden_sise' is not a field of the model config that can be set (did you mean hidden_size?"),
    ("vocab_size=100", "'vocab_size' is not a field of the model config that can be set (the vocabulary is the "
                       "tokenizer's)"),
    ("hidden_size=64.5", "hidden_size=64.5 is not an int (the default is 4096)"),
    ("tie_word_embeddings=3", "tie_word_embeddings=3 is not a bool"),
    ("num_hidden_layers=0", "num_hidden_layers=0: expected an integer >= 1"),
    ("num_key_value_heads=3", "num_attention_heads=4 must be a multiple of num_key_value_heads=3"),
    ("num_attention_heads=3", "num_attention_heads=3: The hidden size (256) is not a multiple of the number of "
                              "attention heads (3)"),
])
def test_each_mistake_names_the_pair(text, message):
    with pytest.raises(ModelError) as err:
        build(text)
    assert str(err.value).startswith("model.config_overrides: ")
    assert message in str(err.value)


def test_a_pretrained_model_refuses_overrides_at_load():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.name_or_path=models/tiny-qwen2", "model.config_overrides=hidden_size=64"])
    assert ("model.config_overrides: expected empty with model.name_or_path=models/tiny-qwen2: the overrides shape a "
            "model built from scratch (model.name_or_path=synthetic)") in str(err.value)


def test_a_resume_with_other_overrides_is_refused():
    saved = to_dict(load_config(None, ["model.config_overrides=hidden_size=64"]))
    fixed, other = resume_changes(saved, load_config(None, ["model.config_overrides=hidden_size=128"]))
    assert fixed == ["model.config_overrides changed from 'hidden_size=64' to 'hidden_size=128'"] and other == []
