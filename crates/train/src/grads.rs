//! Gradients by parameter: which parameters of a model received a gradient in one backward
//! pass, under their Hugging Face names, with their values (what an optimizer update reads).

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use qatflow_model::params::hf_name;
use qatflow_model::CausalLm;

/// One parameter that received a gradient: its Hugging Face name, its value and the
/// gradient, both flat.
pub struct ParamGrad<B: AutodiffBackend> {
    /// Hugging Face tensor name.
    pub name: String,
    /// The parameter's value, flat.
    pub value: Tensor<B::InnerBackend, 1>,
    /// Its gradient, flat.
    pub grad: Tensor<B::InnerBackend, 1>,
}

struct Grads<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    path: Vec<String>,
    out: Vec<ParamGrad<B>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Grads<'_, B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        if let Some(g) = value.grad(self.grads) {
            let n: usize = g.dims().iter().product();
            self.out.push(ParamGrad {
                name: hf_name(&self.path),
                value: value.inner().reshape([n]),
                grad: g.reshape([n]),
            });
        }
    }
}

/// Every parameter of `model` with a gradient in `grads`, in module order.
pub fn param_grads<B: AutodiffBackend>(
    model: &CausalLm<B>,
    grads: &B::Gradients,
) -> Vec<ParamGrad<B>> {
    let mut visitor = Grads::<B> {
        grads,
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut visitor);
    visitor.out
}
