//! The model every key is checked against: a register that holds one value
//! or nothing, with the operations of the client protocol.

/// The register's content.
pub type State = Option<String>;

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Get,
    Put(String),
    Delete,
    /// Sets `new` if the current value is `expect` (`None`: absent).
    Cas {
        expect: Option<String>,
        new: String,
    },
}

/// What the cluster answered, as the client protocol reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Get(Option<String>),
    Put,
    Delete {
        existed: bool,
    },
    /// `current` is the value found when not swapped (`None` when swapped).
    Cas {
        swapped: bool,
        current: Option<String>,
    },
}

impl Input {
    pub fn is_write(&self) -> bool {
        !matches!(self, Input::Get)
    }

    /// The value `output` shows the register held when this op took effect.
    pub fn observed<'a>(&'a self, output: &'a Output) -> Option<&'a String> {
        match (self, output) {
            (Input::Cas { expect, .. }, Output::Cas { swapped: true, .. }) => expect.as_ref(),
            (_, Output::Get(value) | Output::Cas { current: value, .. }) => value.as_ref(),
            _ => None,
        }
    }

    /// The value this op writes if it takes effect (and, for a cas, swaps).
    pub fn written(&self) -> Option<&String> {
        match self {
            Input::Put(value) | Input::Cas { new: value, .. } => Some(value),
            Input::Get | Input::Delete => None,
        }
    }

    /// The register's next state, and what it answers.
    pub fn apply(&self, state: &State) -> (State, Output) {
        match self {
            Input::Get => (state.clone(), Output::Get(state.clone())),
            Input::Put(value) => (Some(value.clone()), Output::Put),
            Input::Delete => (None, Output::Delete { existed: state.is_some() }),
            Input::Cas { expect, new } if expect == state => {
                (Some(new.clone()), Output::Cas { swapped: true, current: None })
            }
            Input::Cas { .. } => (state.clone(), Output::Cas { swapped: false, current: state.clone() }),
        }
    }
}
