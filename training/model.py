"""Keras models: the training graph and its stateful inference twin.

Training:  ids (B, T) -> Embedding -> N x (LSTM | GRU, dropout after each) -> Dense(V) logits.
Inference: the same layers (same names, so weights copy by name) taking and returning the
recurrent state, without dropout, so one graph serves prefill (T = seed length) and decode (T = 1).
Stateful training (truncated BPTT): the training graph with a fixed batch of B streams whose
recurrent state carries from one batch to the next; it has the same weights as the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Cell = Literal["lstm", "gru"]


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    cell: Cell = "lstm"
    layers: int = 2
    units: int = 256
    embedding_dim: int = 64
    dropout: float = 0.2

    @property
    def states_per_layer(self) -> int:
        return 2 if self.cell == "lstm" else 1

    def state_names(self) -> list[str]:
        """Per layer: h (and c for LSTM), in layer order; these are the ONNX input names."""
        kinds = ["h", "c"][: self.states_per_layer]
        return [f"{k}{i}" for i in range(self.layers) for k in kinds]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rnn_layer(cfg: ModelConfig, i: int, return_state: bool, stateful: bool = False) -> Any:
    import keras

    # No recurrent_dropout: it stops tf2onnx from emitting the fused ONNX LSTM op (GRU graphs
    # are written by training/gru_graph.py, which has no place for it either).
    layer_cls = keras.layers.LSTM if cfg.cell == "lstm" else keras.layers.GRU
    return layer_cls(cfg.units, return_sequences=True, return_state=return_state,
                     stateful=stateful, name=f"rnn_{i}")


def build_training_model(cfg: ModelConfig, stateful_batch: int | None = None,
                         window: int | None = None) -> Any:
    """ids (B, T) -> logits (B, T, V). With `stateful_batch`, B is fixed to it and each batch
    starts from the state the previous one ended in (row j continues row j); `reset_states`
    zeroes it. Keras keeps that state outside the weights, so checkpoints load either way.
    With `window`, T is fixed to it (the recurrent loop then has a known length); the weights
    are the same either way."""
    import keras

    if stateful_batch is None:
        ids = keras.Input(shape=(window,), dtype="int32", name="ids")
    else:
        ids = keras.Input(batch_shape=(stateful_batch, window), dtype="int32", name="ids")
    x = keras.layers.Embedding(cfg.vocab_size, cfg.embedding_dim, name="embedding")(ids)
    for i in range(cfg.layers):
        x = _rnn_layer(cfg, i, return_state=False, stateful=stateful_batch is not None)(x)
        if cfg.dropout > 0:
            x = keras.layers.Dropout(cfg.dropout, name=f"dropout_{i}")(x)
    # float32 logits whatever the precision policy: the loss and softmax need the range.
    logits = keras.layers.Dense(cfg.vocab_size, name="logits", dtype="float32")(x)  # (B, T, V)
    return keras.Model(ids, logits, name="char_rnn")


def build_inference_model(cfg: ModelConfig) -> Any:
    """Inputs [ids, *states]; outputs {"logits", "<state>_out"...}."""
    import keras

    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    states_in = [keras.Input(shape=(cfg.units,), name=n) for n in cfg.state_names()]
    x = keras.layers.Embedding(cfg.vocab_size, cfg.embedding_dim, name="embedding")(ids)
    outputs: dict[str, Any] = {}
    k = cfg.states_per_layer
    for i in range(cfg.layers):
        layer_states = states_in[i * k : (i + 1) * k]
        x, *new_states = _rnn_layer(cfg, i, return_state=True)(x, initial_state=layer_states)
        for name, s in zip(cfg.state_names()[i * k : (i + 1) * k], new_states, strict=True):
            outputs[f"{name}_out"] = s
    outputs["logits"] = keras.layers.Dense(cfg.vocab_size, name="logits")(x)
    return keras.Model([ids, *states_in], outputs, name="char_rnn_step")


def stateful_layers(model: Any) -> list[Any]:
    return [layer for layer in model.layers if getattr(layer, "stateful", False)]


def reset_states(model: Any) -> None:
    """Zero the carried state of every stateful recurrent layer (a no-op for other models)."""
    for layer in stateful_layers(model):
        layer.reset_state()


def copy_weights(src: Any, dst: Any) -> None:
    """Copy weights layer by layer, matched by name (dropout layers have none)."""
    by_name = {layer.name: layer for layer in src.layers}
    for layer in dst.layers:
        if layer.weights and layer.name in by_name:
            layer.set_weights(by_name[layer.name].get_weights())


def count_parameters(model: Any) -> int:
    return int(sum(int(w.numpy().size) if hasattr(w, "numpy") else int(w.size)
                   for w in model.weights))
