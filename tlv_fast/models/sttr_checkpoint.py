"""The published STTR checkpoints' layout: their parameter names are this package's module names, so loading only
drops what the forward never reads and renames torch's newer weight-norm parametrisation."""

# The published checkpoints were saved before BatchNorm tracking was switched off: their running statistics carry
# nothing the forward uses (every BatchNorm normalises with batch statistics) and are dropped on load.
STTR_LEGACY_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


def sttr_from_published_state_dict(sd):
    """A published STTR state dict (or a checkpoint dict holding one under 'state_dict') -> our names: drops legacy
    BatchNorm statistics and a DataParallel 'module.' prefix, and renames torch's newer weight-norm parametrisation
    (parametrizations.weight.original0/1) to the weight_g/weight_v the published files use."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    out = {}
    for key, value in sd.items():
        if key.endswith(STTR_LEGACY_SUFFIXES):
            continue
        key = key[len("module."):] if key.startswith("module.") else key
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        key = key.replace(".parametrizations.weight.original1", ".weight_v")
        out[key] = value
    return out
