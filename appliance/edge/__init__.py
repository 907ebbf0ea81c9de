"""The control plane's side of edge images: what needs the site file or Vault (`edge_image` gets plain inputs)."""
