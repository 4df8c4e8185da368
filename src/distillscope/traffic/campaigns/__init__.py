"""Campaign shapes: the ways a distiller's traffic can look (hydra clusters, stealth accounts,
resellers, slow drips of reasoning requests, tool-trajectory harvesting)."""
