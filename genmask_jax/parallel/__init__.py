"""Device meshes, logical axis rules, data-loading groups and multi-host initialisation."""
