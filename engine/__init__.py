"""One model replica's serving state machine; works in token ids only and never imports ray."""
