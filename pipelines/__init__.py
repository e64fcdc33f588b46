"""vidattn.pipelines: diffusers processors, apply/remove, timm swaps, tiny offline pipelines."""
