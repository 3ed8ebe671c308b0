"""Speed and memory figures for dfkd, measured with ratios taken in the same run."""
