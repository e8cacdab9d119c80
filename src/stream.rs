//! Books into ONE stream of fed tokens, each paired with the token it lets the model score
//! (spec section 1): inside a book of n tokens, tokens 0..n-2 are fed and token i+1 is scored
//! right after token i, so the last token of a book is scored but never fed.
//!
//! ```
//! use streamppl::stream::TokenStream;
//! let s = TokenStream::new(&[vec![10, 11, 12], vec![20, 21]], &[7, 7], None);
//! assert_eq!(s.fed, vec![7, 7, 10, 11, 20]);
//! assert_eq!(s.scored_count(), 3);
//! ```

/// What is scored right after a fed token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub token: u32,
    pub book: u32,
    /// Index of the fed token among the corpus's fed tokens (injected sink tokens excluded),
    /// the same for every strategy, so runs compare token by token.
    pub position: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenStream {
    /// Every token fed to the model, in order; injected sink tokens first.
    pub fed: Vec<u32>,
    /// `targets[i]`: what is scored after `fed[i]`; `None` for injected sink tokens.
    pub targets: Vec<Option<Target>>,
}

impl TokenStream {
    /// `prefix` tokens (e.g. `--sink-text`) are fed first and never scored; `max_scored` stops
    /// after that many scored tokens (the reference loop's `num_eval_tokens`).
    pub fn new(books: &[Vec<u32>], prefix: &[u32], max_scored: Option<u64>) -> Self {
        let mut s = TokenStream {
            fed: prefix.to_vec(),
            targets: vec![None; prefix.len()],
        };
        let mut position = 0u64;
        'books: for (b, ids) in books.iter().enumerate() {
            for pair in ids.windows(2) {
                if max_scored.is_some_and(|m| position >= m) {
                    break 'books;
                }
                s.fed.push(pair[0]);
                s.targets.push(Some(Target {
                    token: pair[1],
                    book: b as u32,
                    position,
                }));
                position += 1;
            }
        }
        s
    }

    /// Keeps only the targets at positions 0, k, 2k, ...: every fed token is still fed, but
    /// only a systematic 1-in-k sample is scored (`--score-every k`).
    pub fn sample_every(mut self, k: u64) -> Self {
        for t in self.targets.iter_mut() {
            if t.is_some_and(|t| t.position % k != 0) {
                *t = None;
            }
        }
        self
    }

    pub fn len(&self) -> usize {
        self.fed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fed.is_empty()
    }

    pub fn scored_count(&self) -> u64 {
        self.targets.iter().filter(|t| t.is_some()).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_token_of_a_book_is_never_fed_and_first_never_scored() {
        let s = TokenStream::new(&[vec![1, 2, 3], vec![4], vec![5, 6]], &[], None);
        assert_eq!(s.fed, vec![1, 2, 5]);
        let scored: Vec<(u32, u32, u64)> = s
            .targets
            .iter()
            .flatten()
            .map(|t| (t.token, t.book, t.position))
            .collect();
        assert_eq!(scored, vec![(2, 0, 0), (3, 0, 1), (6, 2, 2)]);
    }

    #[test]
    fn sampling_keeps_every_kth_target_and_feeds_everything() {
        let s = TokenStream::new(&[vec![1, 2, 3, 4, 5, 6, 7]], &[], None).sample_every(3);
        assert_eq!(s.fed.len(), 6);
        let kept: Vec<u64> = s.targets.iter().flatten().map(|t| t.position).collect();
        assert_eq!(kept, vec![0, 3]);
    }

    #[test]
    fn max_scored_stops_the_stream() {
        let s = TokenStream::new(&[vec![1, 2, 3, 4], vec![5, 6]], &[9], Some(2));
        assert_eq!(s.fed, vec![9, 1, 2]);
        assert_eq!(s.scored_count(), 2);
        assert_eq!(s.targets[0], None);
    }
}
