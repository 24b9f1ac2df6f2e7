use crate::error::{Error, Result};

/// The dims of a tensor, outermost first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    pub fn new(dims: &[usize]) -> Shape {
        Shape(dims.to_vec())
    }
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }
    /// Row-major strides, in elements.
    pub fn contiguous_strides(&self) -> Vec<usize> {
        let mut s = vec![1; self.0.len()];
        for k in (0..self.0.len().saturating_sub(1)).rev() {
            s[k] = s[k + 1] * self.0[k + 1];
        }
        s
    }
    /// Replaces one `usize::MAX` entry by whatever makes the sizes agree.
    pub fn resolve(&self, dims: &[usize]) -> Result<Vec<usize>> {
        let n = self.numel();
        let holes = dims.iter().filter(|&&d| d == usize::MAX).count();
        let known: usize = dims.iter().filter(|&&d| d != usize::MAX).product();
        let out: Vec<usize> = match holes {
            0 => dims.to_vec(),
            1 if known > 0 && n.is_multiple_of(known) => {
                dims.iter().map(|&d| if d == usize::MAX { n / known } else { d }).collect()
            }
            _ => return Err(Error::shape(format!("cannot reshape {:?} into {:?}", self.0, dims))),
        };
        if out.iter().product::<usize>() != n {
            return Err(Error::shape(format!("cannot reshape {:?} into {:?}", self.0, dims)));
        }
        Ok(out)
    }
}
