//! The routed endpoints of the API: what each one's requests are, which routes serve them, and
//! where a target of each wire format takes them.

use crate::api::Serves;
use crate::config::Format;

/// An API endpoint whose requests are routed by `model` to a route's targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/messages`: Anthropic's Messages.
    Messages,
    /// `POST /v1/responses`: OpenAI's Responses, stateless.
    Responses,
    /// `POST /v1/completions`: OpenAI's legacy text completions.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
}

impl Endpoint {
    /// The shape of the endpoint's requests, answers and errors.
    pub fn format(self) -> Format {
        match self {
            Endpoint::Messages => Format::Anthropic,
            Endpoint::Chat | Endpoint::Responses | Endpoint::Completions | Endpoint::Embeddings => Format::OpenAi,
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Messages => "/v1/messages",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }

    /// What a route must serve for this endpoint to take its models.
    pub fn serves(self) -> Serves {
        match self {
            Endpoint::Embeddings => Serves::Embeddings,
            Endpoint::Chat | Endpoint::Messages | Endpoint::Responses | Endpoint::Completions => Serves::Chat,
        }
    }

    /// Where a target speaking `format` (and, with `native_responses`, the Responses API) takes
    /// this endpoint's requests: `Conversation` (its conversation URL, translated between the
    /// formats where they differ), a path under its base URL, or `None` when its API has no such
    /// endpoint.
    pub fn upstream(self, format: Format, native_responses: bool) -> Option<UpstreamPath> {
        match (self, format) {
            (Endpoint::Chat | Endpoint::Messages, _) => Some(UpstreamPath::Conversation),
            (Endpoint::Responses, Format::OpenAi) if native_responses => Some(UpstreamPath::Under("/responses")),
            (Endpoint::Responses, _) => Some(UpstreamPath::Conversation),
            (Endpoint::Completions, Format::OpenAi) => Some(UpstreamPath::Under("/completions")),
            (Endpoint::Embeddings, Format::OpenAi) => Some(UpstreamPath::Under("/embeddings")),
            (Endpoint::Completions | Endpoint::Embeddings, Format::Anthropic) => None,
        }
    }

    /// Whether answers are generated text, so budgets reserve completion tokens for them.
    pub fn generates(self) -> bool {
        self != Endpoint::Embeddings
    }

    /// How the endpoint is named to a user whose target cannot serve it.
    pub fn api_name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat completions",
            Endpoint::Messages => "Messages",
            Endpoint::Responses => "Responses",
            Endpoint::Completions => "legacy completions",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// Where a target takes an endpoint's requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamPath {
    Conversation,
    Under(&'static str),
}

/// What `sideyard_api_calls_total` counts calls of: each routed endpoint, token counts, and the
/// calls passed through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Routed(Endpoint),
    CountTokens,
    Passthrough,
}

impl Api {
    pub const ALL: [Api; 7] = [
        Api::Routed(Endpoint::Chat),
        Api::Routed(Endpoint::Messages),
        Api::Routed(Endpoint::Responses),
        Api::Routed(Endpoint::Completions),
        Api::Routed(Endpoint::Embeddings),
        Api::CountTokens,
        Api::Passthrough,
    ];

    /// Position in [`Api::ALL`], for its counter.
    pub fn index(self) -> usize {
        match self {
            Api::Routed(Endpoint::Chat) => 0,
            Api::Routed(Endpoint::Messages) => 1,
            Api::Routed(Endpoint::Responses) => 2,
            Api::Routed(Endpoint::Completions) => 3,
            Api::Routed(Endpoint::Embeddings) => 4,
            Api::CountTokens => 5,
            Api::Passthrough => 6,
        }
    }

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Api::Routed(Endpoint::Chat) => "chat_completions",
            Api::Routed(Endpoint::Messages) => "messages",
            Api::Routed(Endpoint::Responses) => "responses",
            Api::Routed(Endpoint::Completions) => "completions",
            Api::Routed(Endpoint::Embeddings) => "embeddings",
            Api::CountTokens => "count_tokens",
            Api::Passthrough => "passthrough",
        }
    }
}
