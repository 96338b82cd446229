"""sharding: device meshes and the logical-axis -> mesh-axis rules."""
