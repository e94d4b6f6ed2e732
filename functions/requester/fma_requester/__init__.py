"""fma_requester: takes requests for any configured model and actuates workers."""
