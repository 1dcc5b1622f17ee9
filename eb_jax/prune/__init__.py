"""Pruning criteria other than the BN-scale ticket (eb_jax.ticket): ThiNet, SFP, and the
unstructured SNIP and magnitude (lottery ticket) weight masks."""
