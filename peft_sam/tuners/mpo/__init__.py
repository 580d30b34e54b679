"""MPO tuner (MPOP, Liu et al., ACL 2021): matrix product operator adapters."""
