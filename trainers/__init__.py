"""Training code: imports studio.adapters/formats/models/config/pipeline/shapes, never cli/ui."""
