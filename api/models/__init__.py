"""The API's edge models: request bodies and the answers only the API assembles, one module per
resource. Every body refuses an unknown field with a 422 naming it (`Body`); where a body has the
shape of a contract (`fleetflow/contracts/`), it is that contract's strict subclass and the router
hands Temporal the contract itself (`as_contract`). Limits come from `fleetflow.contracts.limits`."""
